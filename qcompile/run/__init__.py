"""Running built libraries: verify and load them with HF weights (`runtime`), read and write checkpoints
(`weights`), and turn images into pixel values as HF's image processors do (`vision`)."""
