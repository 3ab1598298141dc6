"""The click front end of branchnas (installed as ``branchnas_cli``)."""
