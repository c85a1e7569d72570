"""locaudit.study"""
