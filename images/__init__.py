"""Guest image recipes and builders."""
