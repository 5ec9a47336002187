"""Dashboard pages, one Streamlit script each (registered with st.navigation in app.py)."""
