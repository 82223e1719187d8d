"""The StreamV2V Canvas app: canvas component, sessions, recording, page layout (see app.py)."""
