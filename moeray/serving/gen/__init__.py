"""Generated gRPC stubs; only moeray.serving imports them."""
