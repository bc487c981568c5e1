"""Front doors: command-line tools and the demo; nothing else in cfseg imports from here."""
