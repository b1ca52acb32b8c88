"""The docs stay true: their examples run, the API reference matches the code, links resolve."""

import ast
import importlib
import inspect
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


#: Modules whose public names the API reference must list.
API_MODULES = ["lipnet", "lipnet.nn", "lipnet.bounds", "lipnet.certify", "lipnet.convert", "lipnet.export",
               "lipnet.export.runtime", "lipnet.models", "lipnet.data", "lipnet.training", "lipnet.checkpoint"]


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block of a page."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)] + [ROOT / "README.md"], ids=lambda p: p.name)
def test_examples_run(page, tmp_path, monkeypatch):
    """Each page's blocks run in order, in one namespace, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # the recipes package
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    for line, code in python_blocks(page):
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"{page.name}, block at line {line}: {type(error).__name__}: {error}")


def test_readme_links_resolve():
    text = BLOCK.sub("", (ROOT / "README.md").read_text())
    targets = [t.partition("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", t)]
    assert targets and all((ROOT / t).exists() for t in targets), targets


def test_every_page_with_examples_is_tested():
    assert {p.name for p in PAGES if python_blocks(p)} >= {"getting-started.md", "math.md", "convert.md",
                                                            "export.md", "recipes.md"}


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    return list(names)


def api_sections() -> dict[str, str]:
    """``{module name: text of its section}`` of api.md (``## `name` `` and ``### `name` `` headings)."""
    text = (DOCS / "api.md").read_text()
    parts = re.split(r"^#{2,3} `([\w.]+)`\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_reference_lists_every_public_name(module_name):
    sections = api_sections()
    assert module_name in sections, f"api.md has no section for {module_name}"
    module = importlib.import_module(module_name)
    missing = [n for n in public_names(module) if not re.search(rf"`{re.escape(n)}[`(]", sections[module_name])]
    assert not missing, f"api.md does not document {module_name}.{', '.join(missing)}"


SIGNATURE = re.compile(r"`(\w+)\(([^`]*)\)`")
SEPARATOR = re.compile(r",? and |, ")


def documented_signatures():
    """``(module, name, parameters text)`` for each ``name(...)`` of the list that starts a bullet:
    ``- `f(a, b=1)`, `g(c)` and `h()`: ...`` gives ``f``, ``g`` and ``h``."""
    for module_name, section in api_sections().items():
        for line in re.findall(r"^- (`.*)$", section, flags=re.M):
            pos = 0
            while match := SIGNATURE.match(line, pos):
                if match.group(2) != "...":
                    yield module_name, match.group(1), match.group(2)
                pos = match.end()
                separator = SEPARATOR.match(line, pos)
                if separator is None:
                    break
                pos = separator.end()


@pytest.mark.parametrize("module_name, name, params", list(documented_signatures()),
                         ids=lambda value: value if isinstance(value, str) and "(" not in value else None)
def test_api_signatures_match_the_code(module_name, name, params):
    target = getattr(importlib.import_module(module_name), name)
    actual = inspect.signature(target)
    documented = ast.parse(f"def f({params}): pass").body[0].args
    names = [a.arg for a in documented.posonlyargs + documented.args]
    names += [documented.vararg.arg] if documented.vararg else []
    names += [a.arg for a in documented.kwonlyargs]
    names += [documented.kwarg.arg] if documented.kwarg else []
    if names == [] and [p.kind for p in actual.parameters.values()] == [inspect.Parameter.VAR_POSITIONAL,
                                                                         inspect.Parameter.VAR_KEYWORD]:
        return  # a module without an __init__ of its own
    assert names == list(actual.parameters), f"{module_name}.{name}: documented ({params}), actual {actual}"
    positional = [a.arg for a in documented.posonlyargs + documented.args]
    defaults = dict(zip(positional[len(positional) - len(documented.defaults):], documented.defaults))
    defaults.update({a.arg: d for a, d in zip(documented.kwonlyargs, documented.kw_defaults) if d is not None})
    for parameter in actual.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        assert (parameter.name in defaults) == (parameter.default is not inspect.Parameter.empty), (
            f"{module_name}.{name}: the default of {parameter.name} is {parameter.default!r} in the code")
        if parameter.name not in defaults or repr(parameter.default) == "<factory>":
            continue
        try:
            value = ast.literal_eval(defaults[parameter.name])
        except ValueError:
            continue  # a name such as DEFAULT_EPS
        assert value == parameter.default, f"{module_name}.{name}: {parameter.name}={parameter.default!r} in the code"


def test_recipe_table_matches_recipes():
    sys.path.insert(0, str(ROOT))
    try:
        from recipes import RECIPES
    finally:
        sys.path.remove(str(ROOT))
    text = (DOCS / "recipes.md").read_text()
    table = text[text.index("<!-- recipe-table"):].split("\n\n")[1]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [row[0] for row in rows] == list(RECIPES)

    def radii(cell):
        return [float(Fraction(r)) for r in cell.split(",")]

    for name, dataset, model, epochs, batch, train_eps, eval_eps in rows:
        config = RECIPES[name]
        assert (dataset, model, int(epochs), int(batch)) == (config.dataset, config.model, config.epochs,
                                                             config.batch_size), name
        assert radii(train_eps) == pytest.approx([config.train_eps]), name
        assert radii(eval_eps) == pytest.approx(list(config.eval_eps)), name


def slug(heading: str) -> str:
    """The anchor of a Markdown heading (GitHub's rule)."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_links_and_anchors_resolve():
    anchors = {p.name: {slug(h) for h in re.findall(r"^#+ (.*)$", p.read_text(), flags=re.M)} for p in PAGES}
    broken = []
    for page in PAGES:
        text = BLOCK.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            file = file or page.name
            if not (DOCS / file).exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.endswith(".md") and anchor not in anchors.get(file, set()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
