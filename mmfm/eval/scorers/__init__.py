"""Scorers of generated samples, one module per modality, fitted or computed on the demo corpus'
own labels (mmfm/eval/labels.py), never on generated data.

    linear.py    a standardised multinomial logistic regression stored as .npz (no pickle)
    palette.py   segmentation of rendered scenes and clips by the renderer's known palette
    image.py     digit class (fitted), scene object colour / position (computed) and shape (fitted)
    video.py     the moving object's colour and direction (computed from the centroid track)
    audio.py     which note or chord (fitted on log-spectrum features at semitone bins)
    shape3d.py   which primitive (fitted on scale- and rotation-free point-cloud features)
    physics.py   relative L2 of a continuation, and the repeat-last / mean-field baselines
    text.py      an interpolated bigram model, the perplexity baseline
"""
