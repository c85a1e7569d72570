"""locaudit.edit"""
