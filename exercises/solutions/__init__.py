"""Solutions mode (`pytest exercises/ --solutions`): each chapter's functions written out plainly.

Read these when stuck: every function is the chapter's short version (shapes in trailing comments, a comment where
a decision is made), not a call into tinyqwen. `tests/test_solutions_readable.py` checks each one equal to the
library function it stands for, on random inputs, and that it does not simply call that function.
"""
