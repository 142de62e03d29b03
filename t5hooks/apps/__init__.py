"""Command-line programs and scripts built on the library: `t5hooks` (cli), demo, train-tiny,
benchmarks and the export command. The library never imports from here."""
