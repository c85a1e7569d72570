"""locaudit.cli"""
