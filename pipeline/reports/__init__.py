"""What a person looks at: evaluation reports, pictures of the data and features, and the demo that runs it all.

What the API and CLI use:
    evaluate.evaluate               accuracy, per-class figures, confusion matrix, most confidently wrong images
    pictures.preview, pictures.feature_map   what the backbone sees
    demo.demo                       fetch -> check -> extract -> fit-head -> compare in one command
    present                         every command's result as the text a person reads on the terminal
"""
