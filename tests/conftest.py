import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run on CPU


def pytest_collection_modifyitems(items):
    """The files kept whole in one worker (their `xdist_group` mark: module-wide fixtures) first,
    the longest of them first: `--dist loadgroup` hands work out in collection order, and a
    long file taken up last by one worker kept the other idle at the end."""
    def group(item):
        mark = item.get_closest_marker("xdist_group")
        return mark.args[0] if mark and mark.args else None

    first = ("test_train", "test_export", "test_triton_aot")  # about 250, 250 and 80 s of a run
    items.sort(key=lambda item: first.index(group(item)) if group(item) in first else len(first))
