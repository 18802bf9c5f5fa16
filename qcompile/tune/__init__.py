"""`qcompile tune`: MetaSchedule tasks and measuring (`tasks`), the search loop with its interrupts
(`search`), and what a run reports (`report`)."""
