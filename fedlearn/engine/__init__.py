"""The execution model every transport shares.

Records and messages, the ClientApp protocol and the client runtime, update validation,
safetensors weights, the coordinator's round loop and the SQLite run store.
"""
