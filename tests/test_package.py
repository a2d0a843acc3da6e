"""The top-level package: every public name resolves, lazily, and `import edmfast` needs no torch."""

import subprocess
import sys

import edmfast


def test_all_matches_the_lazy_table_and_every_name_resolves():
    assert sorted(edmfast.__all__) == sorted(edmfast._EXPORTS)
    for name in edmfast.__all__:
        assert getattr(edmfast, name) is not None, name
    assert set(edmfast.__all__) <= set(dir(edmfast))


def test_import_edmfast_does_not_import_torch():
    code = "import sys, edmfast; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute_is_an_attribute_error():
    try:
        edmfast.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("edmfast.no_such_name resolved")
