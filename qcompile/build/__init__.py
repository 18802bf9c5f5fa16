"""Model + target -> a library: the build plan and its identity (`plan`), the pass order (`lowering`),
tuning databases applied (`schedules`), GPU device code (`devicecode`), the export and packaging
(`builder`), and the library format that the runtime and the registry read (`library`)."""
