"""Behaviour data: questions, preference pairs, probe examples, MC items, prompt formats."""

from locaudit.data.behaviour import BehaviourData, load_behaviour, questions_from_pairs
from locaudit.data.caa import available_behaviours, load_caa
from locaudit.data.pairs import load_pairs, preference_pairs
from locaudit.data.probing import probe_examples, probe_text
from locaudit.data.prompts import PromptFormat
from locaudit.data.splits import split_questions
from locaudit.data.truthfulqa import load_mc, load_truthfulqa
from locaudit.data.types import SPLITS, MCItem, PreferencePair, ProbeExample, Question, question_id

__all__ = [
    "SPLITS",
    "BehaviourData",
    "MCItem",
    "PreferencePair",
    "ProbeExample",
    "PromptFormat",
    "Question",
    "available_behaviours",
    "load_behaviour",
    "load_caa",
    "load_mc",
    "load_pairs",
    "load_truthfulqa",
    "preference_pairs",
    "probe_examples",
    "probe_text",
    "question_id",
    "questions_from_pairs",
    "split_questions",
]
