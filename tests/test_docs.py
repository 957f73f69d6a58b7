"""The README's and the docs' promises: their links resolve, and a missing optional package names its extra."""

import re
import sys
from pathlib import Path

import pytest

from pyro_ffjord.datasets.tabular import build_bsds300_from_images, load_bsds300

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_to_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "the README links to no docs page"
    assert [link for link in links if not (ROOT / link).is_file()] == []


@pytest.mark.parametrize("module", ["h5py", "PIL.Image"])
def test_missing_optional_package_names_the_data_extra(tmp_path: Path, monkeypatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    (tmp_path / "BSDS300" / "images" / "train").mkdir(parents=True)
    (tmp_path / "BSDS300" / "BSDS300.hdf5").write_bytes(b"\x89HDF")
    load = load_bsds300 if module == "h5py" else build_bsds300_from_images
    with pytest.raises(ImportError, match=r"pip install 'pyro-ffjord\[data\]'") as error:
        load(tmp_path)
    assert "\n" not in str(error.value)
