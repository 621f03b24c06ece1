"""One install path: CI (.ci/run) runs the README's "Install, run, test" lines word for word, in the same order (the
install, then the fast and the slow test tier), and the test extra holds every optional package the tests import,
so a newcomer's install is the one CI tests."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The install and test command lines of the README's "Install, run, test" section (indented code lines that
    start with pip or python -m), without trailing comments."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Install, run, test\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no '## Install, run, test' section"
    lines = [line[4:].split("  #")[0].strip() for line in section[1].splitlines() if line.startswith("    ")]
    return [line for line in lines if line.startswith(("pip ", "python -m pip ", "python -m pytest"))]


def ci_commands() -> list[str]:
    """The pip and pytest lines .ci/run executes (comments and the system-package block left out)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line.startswith(("pip ", "python -m pip ", "python -m pytest"))]


def test_ci_runs_the_readme_install_and_test_lines_verbatim_and_in_order():
    readme = readme_commands()
    assert any(line.startswith("pip install torch") for line in readme), readme  # torch first, then the project
    assert any("pytest" in line for line in readme), readme
    assert ci_commands() == readme


def test_the_readme_runs_the_fast_tier_then_the_slow_one_and_neither_is_empty():
    """Two tiers: `python -m pytest -q` runs every test not marked slow (pyproject's addopts deselect them) and
    `-m slow` the marked ones; both select tests, so neither ends in pytest's exit 5 ("no tests ran")."""
    assert [line for line in readme_commands() if "pytest" in line] == ["python -m pytest -q",
                                                                        "python -m pytest -q -m slow"]
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m 'not slow'" in options["addopts"] and any(m.startswith("slow:") for m in options["markers"])
    sources = [path.read_text() for path in (ROOT / "tests").glob("test_*.py")]
    assert sum(text.count("pytest.mark.slow") for text in sources) > 0  # the slow tier; the fast one holds this test


def imported_packages(paths) -> set[str]:
    """Top-level names every `import x` and `from x import y` in these files names (functions' own imports too)."""
    import ast

    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;(]", requirement.strip())[0].lower().replace("_", "-")


def test_the_test_extra_brings_every_optional_package_the_tests_import():
    """Every third-party module the code, tests and benchmarks import (`import x` or `from x import y`) comes with the
    core dependencies, the test extra, or a package those require (e.g. tokenizers, with transformers)."""
    import sys
    from importlib import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    brought = set(wanted)
    for name in wanted:  # one level down: what the declared packages themselves require
        brought |= {requirement_name(r) for r in (metadata.requires(name) or []) if "extra ==" not in r}
    files = [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "toyworld").glob("*.py")]
    local = {p.stem for p in files} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    distributions = metadata.packages_distributions()
    for module in sorted(imported_packages(files) - set(sys.stdlib_module_names) - local):
        packages = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert packages, f"{module} is imported but installed by no package here"
        assert packages & brought, (f"the code imports {module} ({', '.join(sorted(packages))}): put it in the test "
                                    "extra (or the dependencies) of pyproject.toml")


def test_the_readme_layout_names_every_file_of_the_house_with_its_length():
    """The README's Layout section names every top-level module and folder, and the line counts it gives are
    within 5 % (or 20 lines) of the files' (a stale count or a new module left out fails)."""
    text = (ROOT / "README.md").read_text()
    layout = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)[1]
    block = "\n".join(line for line in layout.splitlines() if line.startswith("    "))
    for name, stated in re.findall(r"^\s+(\S+\.py)\s+(\d+) lines", block, re.M):
        actual = len((ROOT / name).read_text().splitlines())
        assert abs(actual - int(stated)) <= max(20, 0.05 * actual), (name, stated, actual)
    named = set(re.findall(r"[\w.-]+(?:\.py|/)", block))
    top = {p.name for p in ROOT.glob("*.py")} | {p.name + "/" for p in ROOT.iterdir() if p.is_dir()
                                                 and not p.name.startswith((".", "__")) and not p.name.endswith(
                                                     ".egg-info") and p.name not in ("runs", "wandb")}
    assert top <= named, sorted(top - named)
