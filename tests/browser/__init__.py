"""Tests in a real browser (headless Chromium from Debian's packages, driven over WebDriver)."""
