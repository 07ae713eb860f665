"""Everything that speaks Label Studio: configs, regions, images, the API client, corrections. No torch."""
