"""Tasks, prompt formats, answer extraction and checking."""
