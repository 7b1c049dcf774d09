"""What runs in the booted system: the resize service and ``pystate status``."""
