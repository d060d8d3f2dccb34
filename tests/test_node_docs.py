"""The node help pages: one per node, in step with the nodes' definitions, served where the frontend looks."""

import ast
from pathlib import Path

import pytest

import nodes
from serving import make_app
from web import node_docs
from web.server import EXTENSION_NAME

ROOT = Path(__file__).resolve().parent.parent


def web_directory() -> Path:
    """The pack's WEB_DIRECTORY, read from the root __init__.py (a literal there; importing it needs ComfyUI's
    way of loading a folder as a package)."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    value = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(target, ast.Name) and target.id == "WEB_DIRECTORY" for target in node.targets))
    return (ROOT / value).resolve()


def test_generator_writes_into_the_web_directory():
    assert node_docs.DOCS_DIR == web_directory() / "docs"


@pytest.mark.parametrize("name", list(nodes.NODE_CLASS_MAPPINGS))
def test_every_node_has_a_help_page(name):
    page = web_directory() / "docs" / f"{name}.md"
    assert page.is_file(), f"no help page for {name}; run `{node_docs.REGENERATE_COMMAND}`"


def test_committed_pages_match_the_node_definitions():
    generated = node_docs.generate_pages()
    committed = {path.name: path.read_text(encoding="utf-8") for path in node_docs.DOCS_DIR.glob("*.md")}
    stale = sorted(name for name in generated.keys() | committed.keys()
                   if generated.get(name) != committed.get(name))
    assert not stale, f"help pages out of date: {stale}; run `{node_docs.REGENERATE_COMMAND}` and commit js/docs"


def test_every_technique_note_names_a_readme_heading():
    headings = {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("#")}
    assert {heading for heading, _ in node_docs.TECHNIQUE_NOTES.values()} <= headings


def test_readme_anchor_follows_github():
    assert (node_docs.readme_anchor("Semantic correspondence (SD + DINOv2 feature fusion)")
            == "semantic-correspondence-sd--dinov2-feature-fusion")


async def test_the_app_serves_a_page_where_the_frontend_fetches_it(aiohttp_client, tmp_path):
    # The frontend's NodeHelpService: /extensions/<custom node folder>/docs/<NodeName>.md, and it rejects a
    # text/html answer (the SPA fallback) as "not found".
    client = await aiohttp_client(make_app(tmp_path))
    response = await client.get(f"/extensions/{EXTENSION_NAME}/docs/AtelierTiledSample.md")
    assert response.status == 200 and "text/html" not in response.headers["Content-Type"]
    assert await response.text() == (node_docs.DOCS_DIR / "AtelierTiledSample.md").read_text(encoding="utf-8")


async def test_the_extension_list_loads_no_page_as_a_script(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(tmp_path))
    assert not [url for url in await (await client.get("/extensions")).json() if "/docs/" in url]
