"""Structure of the code base: config keys read == declared, model-agnostic core, clean imports, no machine
paths. Static checks over the source (plus one subprocess import check); each can fail on a regression."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "awm_jax"
sys.path.insert(0, str(ROOT / "configs"))
import awm_base  # noqa: E402

SECTIONS = [k for k, v in awm_base.base_config().items() if isinstance(v, ml_collections.ConfigDict)]
CONFIG_VARS = r"(?:config|cfg|eval_cfg)"


def _declared() -> set[str]:
    out = set()
    for k, v in awm_base.base_config().items():
        if isinstance(v, ml_collections.ConfigDict):
            for kk in v:
                out.add(f"{k}.{kk}")
        else:
            out.add(k)
    return out


def _sources():
    for p in sorted(PKG.rglob("*.py")):
        yield p, p.read_text()


def _reads() -> dict[str, set[str]]:
    """Trainer-config keys the package reads (or writes), with the files that do."""
    sec = "|".join(SECTIONS)
    top = "|".join(k for k in _declared() if "." not in k)
    found: dict[str, set[str]] = {}

    def add(key, path):
        found.setdefault(key, set()).add(str(path.relative_to(ROOT)))

    for path, text in _sources():
        for m in re.finditer(rf"\b{CONFIG_VARS}\.({sec})\.(\w+)\b(?!\s*\()", text):
            add(f"{m.group(1)}.{m.group(2)}", path)
        for m in re.finditer(rf"\b{CONFIG_VARS}\.({sec})\.get\(\s*[\"'](\w+)[\"']", text):
            add(f"{m.group(1)}.{m.group(2)}", path)
        for m in re.finditer(rf"\b{CONFIG_VARS}\.({top})\b(?!\s*\()", text):
            add(m.group(1), path)
        if path.name == "config_lib.py":  # its validation tables of dotted keys
            for m in re.finditer(rf"[\"']({sec})\.(\w+)[\"']", text):
                add(f"{m.group(1)}.{m.group(2)}", path)
        # aliases: ``w = config.awm`` then ``w.beta``
        for m in re.finditer(rf"\b(\w+)\s*=\s*[^=\n]*\b{CONFIG_VARS}\.({sec})\s*$", text, re.M):
            alias, section = m.group(1), m.group(2)
            for a in re.finditer(rf"\b{alias}\.(\w+)\b(?!\s*\()", text):
                add(f"{section}.{a.group(1)}", path)
            for a in re.finditer(rf"\b{alias}\.get\(\s*[\"'](\w+)[\"']", text):
                add(f"{section}.{a.group(1)}", path)
    return found


def test_config_keys_read_equal_keys_declared():
    declared, reads = _declared(), _reads()
    undeclared = {k: sorted(v) for k, v in reads.items() if k not in declared}
    unread = sorted(declared - set(reads))
    assert not undeclared, f"keys read but not declared in configs/awm_base.py: {undeclared}"
    assert not unread, f"keys declared in configs/awm_base.py but never read by awm_jax: {unread}"


def test_every_declared_key_is_documented():
    text = (ROOT / "configs" / "awm_base.py").read_text()
    body = text[text.index("def base_config"):text.index("return c\n")]
    undocumented = [line.strip() for line in body.splitlines()
                    if re.match(r"\s+\w+\.\w+ = ", line) and "ConfigDict()" not in line and "#" not in line]
    assert not undocumented, f"config keys without a comment: {undocumented}"


def _files(*parts):
    for part in parts:
        p = PKG / part
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def test_core_holds_no_sd3_specific_names():
    names = re.compile(r"SD3Transformer2DModel|SD3Config|sd3_grid|awm_jax\.models\.mmdit|models import mmdit")
    hits = [f"{p.relative_to(ROOT)}:{i + 1}: {line.strip()}"
            for p in _files("rl", "sampling", "train.py", "export.py", "convert/lora_export.py",
                            "convert/__init__.py")
            for i, line in enumerate(p.read_text().splitlines()) if names.search(line)]
    assert not hits, "\n".join(hits)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "awm_jax" or len(parts) < 2:
        return None
    return parts[1]


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for path, _ in _sources():
        rel = path.relative_to(PKG).with_suffix("")
        src = rel.parts[0] if len(rel.parts) > 1 else rel.parts[0]
        for mod, names in _imports(path):
            targets = [_package(mod)] + ([_package(f"{mod}.{n}") for n in names] if mod == "awm_jax" else [])
            for dst in targets:
                if dst and dst != src:
                    graph.setdefault(src, set()).add(dst)

    def reach(a, b, seen=()):
        return any(n == b or (n not in seen and reach(n, b, seen + (n,))) for n in graph.get(a, ()))

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reach(b, a)})
    # the toy world is a plug-in family: it may use any core package, and nothing in the core imports it
    cycles = [c for c in cycles if "toy" not in c]
    assert not cycles, f"import cycles between awm_jax packages: {cycles} (graph {graph})"


def test_core_does_not_import_the_toy_world():
    bad = [f"{p.relative_to(ROOT)}: {mod}" for p, _ in _sources() if "toy" not in p.relative_to(PKG).parts
           for mod, _ in _imports(p) if mod.startswith("awm_jax.toy")]
    assert not bad, bad
    code = ("import sys, awm_jax.train, awm_jax.rl.train_step, awm_jax.export, awm_jax.models, awm_jax.data;"
            "print([m for m in sys.modules if m.startswith('awm_jax.toy')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_no_cross_module_underscore_imports():
    bad = [f"{p.relative_to(ROOT)}: from {mod} import {n}" for p, _ in _sources()
           for mod, names in _imports(p) if mod.startswith("awm_jax")
           for n in names if n.startswith("_") and not n.startswith("__")]
    bad += [f"{p.relative_to(ROOT)}: {mod}" for p, _ in _sources()
            for mod, _ in _imports(p) if any(part.startswith("_") and part != "__init__"
                                             for part in mod.split(".")[1:])]
    assert not bad, bad


def test_no_machine_paths_in_the_repo():
    pattern = re.compile(r"(/work/|/root/|/home/\w+|/tmp/pytest|/Users/\w+)")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    here = os.path.relpath(__file__, ROOT)
    hits = []
    for f in tracked:
        p = ROOT / f
        kinds = {".py", ".md", ".json", ".jsonl", ".txt", ".toml", ""}
        if f == here or not p.is_file() or p.suffix not in kinds:
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{f}:{i + 1}" for i, line in enumerate(text.splitlines()) if pattern.search(line)]
    assert not hits, hits[:20]


def test_generic_modules_name_no_family():
    """The sampling CLI, evaluation, trainer, planner, RL and samplers ask the family (``ModelFamily``
    hooks) instead of branching on its name: no string literal of a built-in family name in them."""
    from awm_jax.models.family import BUILTIN_FAMILIES

    names = "|".join(n for n in BUILTIN_FAMILIES if n != "toy")
    lit = re.compile(rf"[\"']({names})[\"']")
    generic = ["sample.py", "evaluate.py", "train.py", "plan.py", "evaluation", "rl", "sampling"]
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _files(*generic)
           for i, line in enumerate(p.read_text().splitlines(), 1) if lit.search(line)]
    assert not bad, bad


def test_every_family_has_its_sampling_and_evaluation_hooks():
    import importlib

    from awm_jax.models.family import BUILTIN_FAMILIES, get_family

    for name in BUILTIN_FAMILIES:
        fam = get_family(name)
        assert (ROOT / "configs" / fam.default_config).is_file(), (name, fam.default_config)
        if name == "toy":
            assert not fam.sample_loader  # toy checkpoints are no diffusers pipeline folders
            continue
        module, fn = fam.sample_loader.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), fam.sample_loader
