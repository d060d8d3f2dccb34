"""Few-step and smaller models from the papers' published weights: Hyper-SD's LoRAs, InstaFlow's rectified flows and
KOALA's UNets, each with the sampler settings its authors run it with."""
