"""Whether a new version earns its traffic: the statistics behind canary decisions, as pure functions.

sequential  anytime-valid confidence sequences for approval rates and win rates, and the promote /
            rollback / undecided rule on them, safe to read after every rating
arena       Bradley-Terry ratings of versions from head-to-head comparisons on the Elo scale, with
            bootstrap intervals, as Chatbot Arena computes them
"""
