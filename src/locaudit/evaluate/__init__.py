"""locaudit.evaluate"""
