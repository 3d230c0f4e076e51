"""Root conftest: registers the fixture plugins shared by all test folders."""

pytest_plugins = [
    "tests.fixtures.real",
    "tests.fixtures.apiserver",
    "tests.fixtures.kube",
    "tests.fixtures.libvirt",
    "tests.fixtures.operator",
]
