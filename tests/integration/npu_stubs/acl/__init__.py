"""Stand-in for the Ascend runtime's ``acl`` module (real-MindIE integration test only, no NPU present)."""
