"""The course's graded exercises: `exercises/chNN_*.py` are yours to fill in; `pytest exercises/` grades them."""
