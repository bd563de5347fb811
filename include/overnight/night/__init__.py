"""The night: the market DAGs (factory, timetable, alerts, asset events) and their steps.

The pipeline loads (`loading`), calculates (`calculate`) and writes (`writing`) each batch of users.
"""
