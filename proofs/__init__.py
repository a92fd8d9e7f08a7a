"""SymPy derivations of the paper's results, one module per result."""
