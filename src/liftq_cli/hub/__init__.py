"""Publishing to the Hugging Face Hub: folder metadata, the model card, and the upload.

`folder.read_folder` reads what a liftq output folder says about itself (config.json,
liftq.json, eval JSON; the only module here that reads local files); `card.render_card` turns
that into a README.md with Hub metadata (pure); `upload.push` creates the repo, commits the
folder plus the card and reads config.json back (the only module that talks to the network);
`errors.hub_error` maps the client's failures to liftq's exit codes.
"""
