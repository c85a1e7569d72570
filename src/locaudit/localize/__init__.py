"""locaudit.localize"""
