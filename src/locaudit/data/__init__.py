"""Behaviour data: questions, preference pairs, probe examples, MC items, prompt formats."""
