"""The suite's own plumbing: under `make test` (pytest-xdist, --dist loadgroup) every test of a
file runs on one worker, so a file's module-scoped fixtures (trained adapters, the bench quick
runs) are built once. xdist names a test's group by appending it to the node id; pytest 9.2
stopped that from taking effect (pytest-xdist issue 1386) and every test became its own group,
nothing failing: this test is what fails then."""

from __future__ import annotations


def test_a_file_is_one_xdist_group(request):
    if not (hasattr(request.config, "workerinput") and request.config.getvalue("loadgroup")):
        return  # not an xdist worker under --dist loadgroup: there are no groups to check
    assert request.node.nodeid.endswith("@tests/test_suite_grouping.py"), request.node.nodeid
