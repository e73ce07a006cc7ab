"""Measuring tools: `dglocal bench` (bench) and its roofline estimate (roofline). Import dglocal.generation and
dglocal.runtime; render nothing (dglocal.cli.render does)."""
