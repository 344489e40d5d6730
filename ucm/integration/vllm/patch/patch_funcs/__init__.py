"""One package per supported vLLM minor version: v<major>_<minor>, each exporting PATCHES."""
