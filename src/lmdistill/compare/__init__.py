"""`lmdistill compare`: the experiment runner (the top layer, beside the command line): its recipe
(`config`), the protocol stages and the methods (`runner`), and what it writes (`report`)."""
