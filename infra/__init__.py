"""deepfleet: infrastructure as code for private DeepSeek inference clusters."""
