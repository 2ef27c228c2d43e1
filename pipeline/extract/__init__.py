"""``loraforge extract``: plan from headers, one task per tensor (diff, low-rank factors or
kept diff into the work directory), resume decisions, and the write stage."""
