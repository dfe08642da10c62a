"""torch.library registrations of the fused ops (custom_op + register_fake + autograd)."""
