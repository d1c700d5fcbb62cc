"""Resume against the checkpoint's own config (issue 26): keys that change what the saved state means are
refused naming key, old and new value (before any model loads, nothing moved or rewritten, ``--fresh`` does
not quarantine good checkpoints); other changes are listed in one message and need ``--allow-config-change``,
which records them in ``config_history.jsonl`` (``config.json`` is not overwritten)."""

import json
import shutil

import pytest
import test_train as tt

from awm_jax import train


def _main(wd, *extra) -> int:
    args = tt._cli(str(wd), "--config.checkpoint.async_save=false", "--config.checkpoint.every=1",
                   "--config.max_steps=2", *extra)[0]
    return train.main(args[3:])


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    wd = tmp_path_factory.mktemp("resume") / "wd"
    tt.MOCK.update(nan_calls=set(), report_finite=True, sleep=0.0)
    assert _main(wd) == 0
    return wd


def _snapshot(wd):
    return {str(p): p.read_bytes() for p in wd.rglob("*") if p.is_file()}


def _err_lines(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


@pytest.mark.parametrize("change,key,old,new", [
    (("--config.algorithm=nft",), "algorithm", '"awm"', '"nft"'),
    (("--config.lora.alpha=32",), "lora.alpha", "16.0", "32.0"),
    (("--config.lora.rank=4", "--fresh"), "lora.rank", "8", "4"),
], ids=["algorithm", "lora_alpha", "lora_rank_fresh"])
def test_meaning_changes_are_refused(run2, tmp_path, capsys, change, key, old, new):
    wd = tmp_path / "wd"
    shutil.copytree(run2, wd)
    before = _snapshot(wd)
    assert _main(wd, "--config.max_steps=3", *change) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: resume of {wd} from checkpoint 2 refused"), err
    assert f"{key}: {old} -> {new}" in err[0] and "new --workdir" in err[0]
    assert "--fresh" not in err[0] and "orbax" not in err[0]
    assert _snapshot(wd) == before  # nothing quarantined, no log or config.json rewritten


def test_other_changes_listed_then_allowed_and_recorded(run2, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(run2, wd)
    before = _snapshot(wd)
    change = ("--config.optim.lr=0.002", "--config.data.prompts_per_step=2", "--config.max_steps=3")
    assert _main(wd, *change) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "the config differs from the checkpoint's in 2 key(s)" in err[0], err
    assert "data.prompts_per_step: 4 -> 2" in err[0] and "optim.lr: 0.003 -> 0.002" in err[0]
    assert "--allow-config-change" in err[0] and _snapshot(wd) == before
    assert _main(wd, *change, "--allow-config-change") == 0
    out = capsys.readouterr().out
    assert "resumed with 2 config change(s)" in out and "resumed from step 2" in out
    hist = [json.loads(x) for x in open(wd / "config_history.jsonl")]
    assert hist == [{"resumed_at_step": 2, "time": hist[0]["time"],
                     "changes": {"data.prompts_per_step": {"old": 4, "new": 2},
                                 "optim.lr": {"old": 0.003, "new": 0.002}}}]
    assert (wd / "config.json").read_bytes() == before[str(wd / "config.json")]  # not overwritten
    assert [r["step"] for r in tt._metrics(str(wd))] == [1, 2, 3]
    assert _main(wd, *change[:2], "--config.max_steps=4") == 0  # step 3 holds the new config: no change now
    assert len(open(wd / "config_history.jsonl").readlines()) == 1
