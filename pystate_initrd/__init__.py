"""pystate: one state partition, a TPM2-sealed LUKS2 image inside it, escaped-name bind mounts."""

__version__ = "0.1.0"
