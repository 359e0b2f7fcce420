def convert(model):  # placeholder, being written
    raise NotImplementedError
