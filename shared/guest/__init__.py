"""The Run Command guest scripts (PowerShell files) and the parsers of what they print."""
