"""The node fixtures of tests/dicom_node, for the PACS tests."""
from tests.dicom_node.conftest import start_node  # noqa: F401 (a fixture: pytest finds it by name here)
