"""Code versions: a hash of a stage's code as syntax (comments, docstrings and layout left out), on every asset."""

from fineinstructions_dagster.lib.versions import code_fingerprint, code_version
from fineinstructions_dagster.stages import instantiation, judging

CODE = '''
def f(x):
    """What f does."""
    return x + 1  # one more
'''


def test_the_fingerprint_reads_the_code_not_its_comments_docstrings_or_layout():
    same = 'def f(x):\n    """Another docstring."""\n\n    return (x +\n            1)\n'
    assert code_fingerprint(CODE) == code_fingerprint(same)
    assert code_fingerprint(CODE) != code_fingerprint(CODE.replace("x + 1", "x + 2"))
    assert code_fingerprint(CODE) != code_fingerprint(CODE.replace("def f", "def g"))


def test_a_stage_version_is_its_modules_whatever_their_order():
    assert code_version(instantiation, judging) == code_version(judging, instantiation)
    assert code_version(instantiation) != code_version(judging)


def test_every_asset_has_a_code_version():
    from fineinstructions_dagster.definitions import defs

    # (the observed inputs and removal lists are versioned by their data, not by code)
    missing = [n.key.to_user_string() for n in defs.resolve_asset_graph().asset_nodes
               if n.is_materializable and not n.code_version]
    assert missing == []
