"""The `oppu` command (oppu.cli), above every package it drives: simulations/, client/,
coordinator/ and shared/ (../DESIGN.md's layers)."""
