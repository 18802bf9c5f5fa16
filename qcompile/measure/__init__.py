"""Measuring qcompile against its references: the transformers reference (`reference`), the cross-backend
regression harness (`check`), the side-by-side speed benchmark (`bench`) and the demo (`demo`)."""
